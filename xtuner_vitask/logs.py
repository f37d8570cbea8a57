"""Console hygiene shared by the CLIs, the demo, the tiny pretraining and the benchmarks."""
import contextlib
import logging


@contextlib.contextmanager
def quiet_mmengine(verbose=False):
    """mmengine's INFO lines hidden unless ``verbose``: XTuner's wrappers print the whole model tree through them."""
    if verbose:
        yield
        return
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
