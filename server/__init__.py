"""The coordinator side: Flower ServerApp and the hymate-server command."""
