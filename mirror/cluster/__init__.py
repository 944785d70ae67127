"""What the mirrors of a cluster share with one another."""
