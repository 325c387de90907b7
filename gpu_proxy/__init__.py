"""gpu-proxy: the Dom0 daemon that runs forwarded CUDA calls for zones."""
