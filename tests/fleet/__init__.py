"""Test harnesses for the Flower app; they do not ship (pyproject lists only the edge_qmul packages).

- ``loopback``: a real deployment on 127.0.0.1 (flower-superlink with TLS and SuperNode authentication,
  flower-supernode processes, the `flwr` CLI), for tests/test_federated_deploy.py and bench/intake_load.py;
- ``inprocess``: an in-process Flower Grid for the fast tests and bench/federated_modes.py;
- ``faults``: a device that misbehaves on purpose (forged, replayed, foreign requests; a broken runtime);
- ``probe``: a server that misbehaves on purpose: it asks each device about requests that device never filed;
- ``simulation``: the same apps under Flower's simulation engine (Ray) with up to 1,000+ virtual devices, each
  with its own state dir, for tests/test_fleet_simulation.py and bench/fleet_scale.py.

Tests import them as ``fleet.*`` (pytest puts tests/ on sys.path); scripts under bench/ add tests/ first.
"""
