"""Running one config at any scale: sharded train steps, multi-process JAX, ahead-of-time
compilation for TPU topologies (`mmjax compile`), and launching (`mmjax launch`)."""
