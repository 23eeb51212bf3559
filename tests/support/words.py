"""Words for test prompts."""

WORDS = ("the quick brown fox jumps over a lazy dog while prompt and token phases split across "
         "machines moving key value caches layer by layer so that transfer hides behind compute "
         "hello world serving models on clusters with queues pools routers and workers").split()
