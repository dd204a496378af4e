"""The engine: jitted steps over the mesh (more to come: sampling, scheduler, detokenizer)."""
