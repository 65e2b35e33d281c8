"""Bytes at rest and in flight, below the learning core: the wire format of shared records (arrays plus JSON,
never pickles) and the on-disk store of the tasks that are not resident."""
