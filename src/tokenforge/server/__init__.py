"""The OpenAI-compatible HTTP server: `tokenforge serve` (cli.py) runs `api.build_app` under uvicorn.

Nothing is imported here, so that the main CLI can register `serve` without loading FastAPI or torch.
"""
