#!/usr/bin/env node
import { main } from './cli.js';
import { processIO } from './io.js';

// `fastmax demo | head` closes the pipe early: stop quietly, as Unix tools do, rather than crash.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(0);
    throw error;
  });
}

process.exitCode = await main(process.argv.slice(2), processIO());
