"""PEMA (Plug-in External Memory Adaptation) as a pure library: math and model code, no I/O to networks."""
