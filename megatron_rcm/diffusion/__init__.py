"""The rCM method: TrigFlow maps, time samplers, sCM / DMD / critic losses, samplers, EMA."""
