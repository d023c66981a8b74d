"""Hosts: the engines fasteer steers inside (see docs/design.md, "Hosts").

A host supplies the carriers (which module reads each stream point, and its norm's call
contract) and the per-token routing; the interventions, the plan compiler and the slot
tables are shared. Hugging Face transformers is the built-in host (`fasteer.patch`);
`fasteer.hosts.vllm` is the vLLM plugin. Nothing here is imported by `import fasteer`.
"""
