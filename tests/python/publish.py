# -*- coding: utf-8 -*-
"""
Publishes BODY (JSON) to EXCHANGE with ROUTING_KEY with Python farine's Publisher, configured
by the section SERVICE of $FARINE_INI, as a method decorated with
@farine.amqp.publish(exchange=EXCHANGE, routing_key=ROUTING_KEY) does, then prints `PUBLISHED`.

    python publish.py EXCHANGE ROUTING_KEY BODY SERVICE
"""
import json
import sys

import farine.amqp
import farine.settings


def main():
    exchange, routing_key, body, service = sys.argv[1:5]
    farine.settings.load()
    publisher = farine.amqp.Publisher(exchange, routing_key, service=service)
    publisher.send(json.loads(body))
    sys.stdout.write('PUBLISHED\n')
    sys.stdout.flush()


if __name__ == '__main__':
    main()
