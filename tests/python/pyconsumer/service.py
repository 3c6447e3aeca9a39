# -*- coding: utf-8 -*-
"""
Service `pyconsumer`: consumes what farine publishes to exchange `to_python` with routing key
`made` (Python farine's queue is named after the routing key: `made`) and prints each message,
as a JSON line, for the test to read.
"""
import json
import sys

import farine.amqp


class Pyconsumer(object):

    @farine.amqp.consume(exchange='to_python', routing_key='made')
    def made(self, body, message):
        line = {
            'body': body,
            'exchange': message.delivery_info.get('exchange'),
            'routing_key': message.delivery_info.get('routing_key'),
            'content_type': message.content_type,
        }
        sys.stdout.write('RECEIVED %s\n' % json.dumps(line, sort_keys=True))
        sys.stdout.flush()
        message.ack()
