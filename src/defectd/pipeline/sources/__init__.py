"""Camera sources: GenICam (harvesters), synthetic line, replay."""
