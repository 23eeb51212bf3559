"""Local mode: a SplitInference run as processes on one machine (`phasesplit local`)."""
