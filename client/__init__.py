"""The hospital side: Flower ClientApp and the hymate-client command."""
