"""edge_qmul.federated: the Flower app that collects forget requests from devices (DESIGN §8)."""
