"""Data: the synthetic world (`synthetic`), corpus sources, decoding and quarantine of bad inputs."""
