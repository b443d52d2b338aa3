"""The conversion pipeline: options, the plan and its checks, calibration, the pass over
the layers, each output's reduction, resuming, and the files written around the weights."""
