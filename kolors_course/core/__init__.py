"""What every stage of the course shares: the profiles (one configuration object each),
project-relative paths, progress bars, image grids, per-notebook step folders, the
trigger word's way through the stages, and the context managers that change
process-wide state only for as long as a call needs it (``core.state``)."""
