'use strict';
// The process of one Node.js-runtime function instance: `node node_worker.js`.
//
// The parent (services/executor/node_instance.py) talks to it over stdin and stdout with
// length-prefixed JSON frames (4-byte big-endian length, then the JSON body): first an Init,
// answered by a Ready, then any number of Requests, each answered by one Response. Before the
// user's module is loaded, process.stdout.write is pointed at stderr, so whatever the handler
// prints (console.log included) lands in its log, never in the protocol. After each request the
// worker writes END_OF_INVOCATION on stderr, then the response: the parent knows the output
// before that mark belongs to the invocation.
//
// FC's event-handler contract: `exports.handler = async (event, context) => result`, or the
// callback form `exports.handler = (event, context, callback) => callback(err, result)`. `event`
// is a Buffer with the payload. A Buffer or string result is sent as it is, undefined or null as
// nothing, anything else as JSON.

const fs = require('fs');
const path = require('path');
const { pathToFileURL } = require('url');

const END_OF_INVOCATION = '\x1etaskmode-invocation-end\x1e'; // = instance.END_OF_INVOCATION
const SHOWN_CODE_DIR = '/code'; // where user code appears to live in stack traces, as on FC

const sendFrame = process.stdout.write.bind(process.stdout);
process.stdout.write = process.stderr.write.bind(process.stderr);

let codeDir = '';

function frame(message) {
  const body = Buffer.from(JSON.stringify(message));
  const header = Buffer.alloc(4);
  header.writeUInt32BE(body.length);
  sendFrame(Buffer.concat([header, body]));
}

function userFrames(err) {
  const stack = typeof err?.stack === 'string' ? err.stack.split('\n').slice(1) : [];
  return stack
    .filter((line) => codeDir && line.includes(codeDir + path.sep))
    .map((line) => line.split(codeDir).join(SHOWN_CODE_DIR).trim());
}

function errorBody(err) {
  const isError = err instanceof Error;
  return {
    errorMessage: isError ? err.message : String(err),
    errorType: isError ? err.name || 'Error' : typeof err,
    stackTrace: isError ? userFrames(err) : [],
  };
}

function logError(body) {
  process.stderr.write(`${body.errorType}: ${body.errorMessage}\n`);
  for (const line of body.stackTrace) process.stderr.write(`    ${line}\n`);
}

async function loadHandler(handler) {
  const dot = handler.lastIndexOf('.');
  if (dot <= 0 || dot === handler.length - 1) {
    throw new Error(`invalid handler '${handler}': expected '<module>.<function>'`);
  }
  const modulePath = path.join(codeDir, handler.slice(0, dot));
  const name = handler.slice(dot + 1);
  let mod;
  if (fs.existsSync(modulePath + '.mjs')) {
    mod = await import(pathToFileURL(modulePath + '.mjs').href);
  } else {
    try {
      mod = require(modulePath);
    } catch (err) {
      if (err && err.code === 'ERR_REQUIRE_ESM') {
        mod = await import(pathToFileURL(require.resolve(modulePath)).href);
      } else {
        throw err;
      }
    }
  }
  const fn = mod && (mod[name] ?? mod.default?.[name]);
  if (typeof fn !== 'function') {
    throw new Error(`module '${handler.slice(0, dot)}' has no function '${name}'`);
  }
  return fn;
}

function toBuffer(value) {
  if (value === undefined || value === null) return Buffer.alloc(0);
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (typeof value === 'string') return Buffer.from(value);
  return Buffer.from(JSON.stringify(value));
}

function context(init, request) {
  const deadline = Date.now() + init.timeoutS * 1000;
  const stamp = (level) => (...args) =>
    process.stderr.write(`${new Date().toISOString()} ${request.requestId} [${level}] ${args.join(' ')}\n`);
  return {
    requestId: request.requestId,
    taskId: request.taskId,
    attempt: request.attempt,
    retryCount: request.attempt,
    functionName: init.functionName,
    instanceId: init.instanceId,
    credentials: null,
    function: { name: init.functionName, handler: init.handler, memory: init.memoryMb, timeout: init.timeoutS },
    logger: { debug: stamp('DEBUG'), info: stamp('INFO'), warn: stamp('WARN'), error: stamp('ERROR'), log: stamp('INFO') },
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
}

function call(fn, event, ctx) {
  if (fn.length >= 3) {
    return new Promise((resolve, reject) => {
      const callback = (err, data) => (err ? reject(err) : resolve(data));
      try {
        const returned = fn(event, ctx, callback);
        if (returned && typeof returned.then === 'function') returned.then(resolve, reject);
      } catch (err) {
        reject(err);
      }
    });
  }
  return Promise.resolve().then(() => fn(event, ctx));
}

async function serve(init, fn, request) {
  let response;
  try {
    const result = await call(fn, Buffer.from(request.payload, 'base64'), context(init, request));
    response = { ok: true, payload: toBuffer(result).toString('base64') };
  } catch (err) {
    const body = errorBody(err);
    logError(body);
    response = {
      ok: false,
      payload: Buffer.from(JSON.stringify(body)).toString('base64'),
      errorMessage: `${body.errorType}: ${body.errorMessage}`,
      errorType: 'UnhandledInvocationError',
    };
  }
  process.stderr.write(END_OF_INVOCATION + '\n');
  frame(response);
}

let init = null;
let handlerFn = null;
let pending = Buffer.alloc(0);
let chain = Promise.resolve();

async function onFrame(message) {
  if (init === null) {
    init = message;
    codeDir = fs.realpathSync(init.codeDir);
    try {
      handlerFn = await loadHandler(init.handler);
      frame({ ok: true });
    } catch (err) {
      const body = errorBody(err);
      logError(body);
      frame({
        ok: false,
        errorMessage: `failed to load handler '${init.handler}': ${body.errorType}: ${body.errorMessage}`,
        errorPayload: Buffer.from(JSON.stringify(body)).toString('base64'),
      });
      process.exitCode = 1;
      process.stdin.destroy();
    }
    return;
  }
  await serve(init, handlerFn, message);
}

process.stdin.on('data', (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  while (pending.length >= 4) {
    const size = pending.readUInt32BE(0);
    if (pending.length < 4 + size) break;
    const message = JSON.parse(pending.subarray(4, 4 + size).toString());
    pending = pending.subarray(4 + size);
    chain = chain.then(() => onFrame(message));
  }
});
process.stdin.on('end', () => chain.then(() => process.exit(process.exitCode || 0)));
