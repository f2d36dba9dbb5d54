"""The ground truth graphcost is checked against, kept out of the shipped package: PyTorch's own
FLOP counts and saved tensors (groundtruth.py), measured peaks of real runs (memtrack.py),
per-rank states of real FSDP2 / tensor-parallel sharding (sharding.py). Used by tests/ and
bench/."""
