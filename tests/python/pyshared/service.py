# -*- coding: utf-8 -*-
"""
Service `shared`, the Python half of a service that farine also serves (with
rpc_queue_per_method = true): each call prints `EXECUTED <n>`, so the test counts the calls
Python ran.
"""
import sys
import time

import farine.rpc


class Shared(object):

    @farine.rpc.method()
    def work(self, n):
        sys.stdout.write('EXECUTED %d\n' % n)
        sys.stdout.flush()
        # As long as a call of the Rust half takes, so that both halves take calls.
        time.sleep(0.02)
        return {'by': 'python', 'n': n}
