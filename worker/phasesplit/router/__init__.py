"""The OpenAI-compatible router: the cluster-level scheduler of the two pools."""
