"""Interoperability with other tools' files: Hugging Face model folders (hf_io.py) and the
`convert`/`export` commands (cli.py)."""
