"""Many runs: seed × recipe sweeps, on this machine or a cluster through submitit, and the tables comparing them."""
