# -*- coding: utf-8 -*-
"""Service `pycalc`: an RPC server written with Python farine, called by farine's client."""
import farine.rpc


class Pycalc(object):

    @farine.rpc.method()
    def add(self, a, b):
        return a + b

    @farine.rpc.method()
    def greet(self, name, greeting='hello'):
        return {'text': u'%s, %s' % (greeting, name)}

    @farine.rpc.method()
    def letters(self, text):
        # A generator: Python farine sends one reply per item, then the end marker.
        for letter in text:
            yield letter

    @farine.rpc.method()
    def fail(self, message):
        raise ValueError(message)
