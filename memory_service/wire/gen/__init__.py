"""Generated from protos/memflow/v1/memory.proto by `make proto`; do not edit."""
