"""For developers: `pgrelay dev` (`demo`), a throwaway PostgreSQL cluster from the
local server binaries (`embedded`), and the provisioning the dev command, the
test suite and the benchmark share (`provision`). Never used by `pgrelay serve`.
"""
