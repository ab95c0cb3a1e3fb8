"""What tests, benchmarks and notebooks share: small real models, an OTLP/HTTP receiver, an NVML stand-in, and
pure-torch stand-ins for the compiled sampling kernels of pyg-lib and torch-sparse."""
