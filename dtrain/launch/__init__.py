"""dtrain.launch: the ``dtrain`` command line (cli), its up-front config check (preflight), the
local multi-process launcher (local, zygote), the Ray launcher (ray_*), the rank-side entry
(bootstrap) and the launch-environment contract read by the engine (env)."""
