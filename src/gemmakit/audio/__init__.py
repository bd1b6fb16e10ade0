"""Audio input for Gemma 4 and Gemma 3n: file decoding and resampling (:mod:`.io`) and the log-mel
features their audio encoders read (:mod:`.features`)."""
