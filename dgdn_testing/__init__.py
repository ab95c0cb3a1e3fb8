"""What tests and benchmarks share: small real models, an OTLP/HTTP receiver, and an NVML stand-in."""
