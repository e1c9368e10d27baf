import logging
from fuzz.targets.qcow2 import *  # noqa
from fuzz.targets.qcow2 import one_input, seeds, MAX_LEN  # noqa
logging.getLogger("pyvirt.disk.qcow2").disabled = True
