"""Model families, composed from mmjax.layers: vision towers, bridges, decoders."""
