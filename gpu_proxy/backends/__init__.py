"""GPU backends behind one narrow interface (base.GpuBackend): sim, later cuda."""
