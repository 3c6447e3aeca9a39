# -*- coding: utf-8 -*-
"""
Calls SERVICE with Python farine's RPC client (farine.rpc.client.Client) and prints one JSON line per call:
`RESULT {"ok": <result>}` (a stream: the list of its items), `RESULT {"error": "<last line
of the RPCError>"}` or, when the client got no result, `RESULT {"no_result": true}`.

    python call.py SERVICE '[{"method": "add", "args": [1, 2]}, {"method": "letters",
        "args": ["abc"], "stream": true}, ...]'

Each call uses a client of its own, as farine.rpc.client() does (Python farine's client cannot
be used for a second call: its `running` flag stays down after the first).
"""
import json
import sys

import farine.exceptions
import farine.settings
# farine.rpc's Client (farine.rpc.client is the decorator there, which hides the module).
from farine.rpc import Client


def main():
    service, calls = sys.argv[1], json.loads(sys.argv[2])
    farine.settings.load()
    for call in calls:
        client = Client(service, call.get('timeout', 10))
        method = getattr(client, call['method'])
        kwargs = dict((str(k), v) for k, v in call.get('kwargs', {}).items())
        try:
            if call.get('stream'):
                result = list(method(*call.get('args', []), __stream__=True, **kwargs))
            else:
                result = method(*call.get('args', []), **kwargs)
            line = {'ok': result}
        except farine.exceptions.RPCError as error:
            line = {'error': str(error).strip().splitlines()[-1]}
        except StopIteration:
            # A one-result call whose result is falsy (0, "", null, ...): Python farine's
            # client skips such a body, and its generator ends without a result.
            line = {'no_result': True}
        sys.stdout.write('RESULT %s\n' % json.dumps(line, sort_keys=True))
        sys.stdout.flush()
        client.connection.release()


if __name__ == '__main__':
    main()
