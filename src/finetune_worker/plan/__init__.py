"""Pure translation of a checked job: the Axolotl config, the fast defaults, the DeepSpeed/FSDP presets, and every child process's argv and environment."""
