"""The local cluster: `tandem up` (processes), `tandem serve ROLE` (one service), `tandem compose` (containers)."""
