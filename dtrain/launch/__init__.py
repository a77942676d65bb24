"""dtrain.launch: the ``dtrain`` command line (cli), the local multi-process launcher (local)
and the launch-environment contract read by the engine (env)."""
