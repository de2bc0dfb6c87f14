"""Generation: `python -m jaxlm.generate` (cli.py) over the decode engine (engine.py), with
sampling (sampling.py), beam search (beam.py) and speculative decoding (speculative.py)."""
