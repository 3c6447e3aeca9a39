# -*- coding: utf-8 -*-
"""
Starts the services of MODULE.service with Python farine, as `farine --start=MODULE` does:
settings from $FARINE_INI, then farine.discovery. Without farine.main, whose logging also
writes to syslog; logs go to stderr instead.

    python serve.py MODULE
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format='%(asctime)s %(levelname)s %(name)s %(message)s')

import farine.discovery
import farine.settings


def main():
    module = sys.argv[1]
    farine.settings.load()
    farine.discovery.import_module(module)
    sys.stderr.write('serve.py: starting %s\n' % module)
    sys.stderr.flush()
    farine.discovery.start()


if __name__ == '__main__':
    main()
