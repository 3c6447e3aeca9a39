// Parses each AsyncAPI document named on the command line with the official parser
// (@asyncapi/parser) and prints its diagnostics, one JSON object per line:
// {"file", "severity" (0 error, 1 warning, 2 info, 3 hint), "code", "message", "path"}.
// Exits 1 when a document has an error (or cannot be read), else 0.
import { readFileSync } from 'node:fs';
import { Parser } from '@asyncapi/parser';

const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  let text;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    console.log(JSON.stringify({ file, severity: 0, code: 'read', message: String(error), path: [] }));
    failed = true;
    continue;
  }
  const { document, diagnostics } = await parser.parse(text);
  for (const d of diagnostics) {
    console.log(JSON.stringify({ file, severity: d.severity, code: d.code, message: d.message, path: d.path }));
  }
  if (!document || diagnostics.some((d) => d.severity === 0)) {
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
