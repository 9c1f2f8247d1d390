package io.ledgerlog.bk;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.StringReader;
import java.net.InetAddress;
import java.nio.ByteBuffer;
import java.util.Arrays;
import java.util.Enumeration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.bookkeeper.client.AsyncCallback.AddCallback;
import org.apache.bookkeeper.client.BKException;
import org.apache.bookkeeper.client.BookKeeper;
import org.apache.bookkeeper.client.BookKeeper.DigestType;
import org.apache.bookkeeper.client.LedgerEntry;
import org.apache.bookkeeper.client.LedgerHandle;
import org.apache.bookkeeper.conf.ClientConfiguration;
import org.apache.zookeeper.CreateMode;
import org.apache.zookeeper.KeeperException;
import org.apache.zookeeper.Watcher.Event.KeeperState;
import org.apache.zookeeper.ZooDefs;
import org.apache.zookeeper.ZooKeeper;
import org.apache.zookeeper.data.Stat;
import py4j.GatewayServer;

/**
 * py4j entry point that drives a BookKeeper client (and a ZooKeeper session for metadata)
 * on behalf of ledgerlog's Python code.
 *
 * <p>Every method does a whole batch of work per call: py4j costs tens of microseconds per
 * call and copies {@code byte[]} as base64, so entries cross packed into one array.
 *
 * <ul>
 *   <li>addEntries input: {@code [4-byte big-endian length][bytes]...}</li>
 *   <li>readEntries output: {@code [8-byte entry id][4-byte length][bytes]...}</li>
 * </ul>
 *
 * <p>Ledger handles live in this JVM and are named by gateway handle ids (not ledger ids),
 * so one ledger can be open through several handles (e.g. a writer and a fencing reader).
 *
 * <p>Usage: {@code java -cp CP io.ledgerlog.bk.Gateway PORT [--exit-on-stdin-eof]}; PORT 0
 * picks a free one. Prints {@code LEDGERLOG_GATEWAY_PORT=<n>} on stdout once listening on
 * 127.0.0.1. The auth token, if any, comes from the environment variable
 * {@code LEDGERLOG_GATEWAY_TOKEN}; {@code -Dledgerlog.gateway.tcpNoDelay=false} leaves Nagle
 * on (for measurements only).
 */
public final class Gateway {
    /** Digest used for every ledger created or opened through the gateway. */
    static final DigestType DIGEST = DigestType.CRC32C;
    private static final int ZK_SESSION_TIMEOUT_MS = 10_000;
    private static final int READ_CHUNK_MAX = 1024;

    private final Map<Long, LedgerHandle> handles = new ConcurrentHashMap<>();
    /** Handles opened without recovery: their LAC can move on, so it is re-read. */
    private final Set<Long> readers = ConcurrentHashMap.newKeySet();
    private final AtomicLong nextHandleId = new AtomicLong(1);
    private volatile BookKeeper bk;
    private volatile ZooKeeper zk;
    private volatile long addWaitMillis = 120_000;
    private volatile String zkConnectString;
    private volatile int zkSessionTimeoutMs = ZK_SESSION_TIMEOUT_MS;
    /** Set by the session's watcher when ZooKeeper expired it: the next call starts anew. */
    private volatile boolean zkExpired;
    /** How many ZooKeeper sessions this gateway has had (ephemeral nodes die with each). */
    private final AtomicInteger zkSessions = new AtomicInteger();

    // ------------------------------------------------------------------ connection

    /** Connects the BookKeeper client and a ZooKeeper session to {@code host:port[,...]}. */
    public void connect(String zkConnect) throws Exception {
        connect(zkConnect, "");
    }

    /**
     * Like {@link #connect(String)}, with extra BookKeeper client settings as properties
     * text ({@code key=value} lines, e.g. {@code delayEnsembleChange=true}).
     */
    public synchronized void connect(String zkConnect, String clientProperties) throws Exception {
        if (bk != null) {
            throw new IllegalStateException("already connected");
        }
        Properties extra = new Properties();
        extra.load(new StringReader(clientProperties == null ? "" : clientProperties));
        if (extra.containsKey("ledgerlog.zkSessionTimeoutMs")) {
            zkSessionTimeoutMs = Integer.parseInt(extra.getProperty("ledgerlog.zkSessionTimeoutMs"));
        }
        ClientConfiguration conf = new ClientConfiguration();
        conf.setMetadataServiceUri("zk+hierarchical://" + zkConnect + "/ledgers");
        conf.setZkTimeout(zkSessionTimeoutMs);
        // The default (5000) is a per-handle RateLimiter of 5000 adds/s: batching needs it off.
        conf.setThrottleValue(0);
        for (String key : extra.stringPropertyNames()) {
            conf.setProperty(key, extra.getProperty(key));
        }
        if (extra.containsKey("ledgerlog.addWaitMillis")) {
            addWaitMillis = Long.parseLong(extra.getProperty("ledgerlog.addWaitMillis"));
        }

        zkConnectString = zkConnect;
        ZooKeeper session = newSession(30_000);
        try {
            bk = BookKeeper.forConfig(conf).build();
        } catch (Exception e) {
            session.close();
            throw e;
        }
        zk = session;
    }

    /**
     * A new ZooKeeper session, connected within {@code waitMillis}. Its watcher marks it
     * expired when ZooKeeper expires it, so that the next call opens another one: an expired
     * ZooKeeper handle never recovers by itself, and every call on it would fail forever.
     */
    private ZooKeeper newSession(long waitMillis) throws Exception {
        CountDownLatch connected = new CountDownLatch(1);
        ZooKeeper[] self = new ZooKeeper[1];
        ZooKeeper session = new ZooKeeper(zkConnectString, zkSessionTimeoutMs, event -> {
            if (event.getState() == KeeperState.SyncConnected) {
                connected.countDown();
            } else if (event.getState() == KeeperState.Expired) {
                synchronized (self) {
                    if (self[0] != null && self[0] == zk) {
                        zkExpired = true;
                    }
                }
            }
        });
        synchronized (self) {
            self[0] = session;
        }
        if (!connected.await(waitMillis, TimeUnit.MILLISECONDS)) {
            session.close();
            throw new IOException("ZooKeeperUnavailable: no ZooKeeper session with "
                    + zkConnectString + " within " + waitMillis + " ms");
        }
        zkSessions.incrementAndGet();
        return session;
    }

    /**
     * Replaces an expired ZooKeeper session (ephemeral nodes of the old one are gone: the
     * Python side learns it from {@link #zkSessionCount()} and the nodes' absence).
     */
    private synchronized ZooKeeper renewSession() throws Exception {
        ZooKeeper old = zk;
        if (old != null && !zkExpired && old.getState().isAlive()) {
            return old;
        }
        if (old != null) {
            try {
                old.close();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
        zk = null;
        ZooKeeper fresh = newSession(Math.max(2L * zkSessionTimeoutMs, 5_000L));
        zkExpired = false;
        zk = fresh;
        return fresh;
    }

    /**
     * How many ZooKeeper sessions this gateway has opened (it opens one per expiry); opens
     * the next one first if the current one has expired, so polling it keeps a session.
     */
    public int zkSessionCount() throws Exception {
        session();
        return zkSessions.get();
    }

    /**
     * Ends this gateway's ZooKeeper session from the server's side, as an expiry does:
     * another client attaches to the same session and closes it (for fault tests).
     */
    public void zkExpireSession() throws Exception {
        ZooKeeper z = session();
        CountDownLatch connected = new CountDownLatch(1);
        ZooKeeper twin = new ZooKeeper(zkConnectString, zkSessionTimeoutMs, event -> {
            if (event.getState() == KeeperState.SyncConnected) {
                connected.countDown();
            }
        }, z.getSessionId(), z.getSessionPasswd());
        try {
            if (!connected.await(10, TimeUnit.SECONDS)) {
                throw new IOException("could not attach to the session to expire it");
            }
        } finally {
            twin.close();
        }
    }

    /** Closes every handle, the BookKeeper client and the ZooKeeper session. */
    public synchronized void disconnect() throws Exception {
        zkConnectString = null;
        for (Long id : List.copyOf(handles.keySet())) {
            LedgerHandle lh = handles.remove(id);
            readers.remove(id);
            if (lh != null) {
                try {
                    lh.close();
                } catch (Exception ignored) {
                    // a fenced or failed handle cannot close cleanly; nothing to keep
                }
            }
        }
        if (bk != null) {
            bk.close();
            bk = null;
        }
        if (zk != null) {
            zk.close();
            zk = null;
        }
    }

    /** Disconnects and ends this JVM shortly after the call returns. */
    public void exit() {
        Thread t = new Thread(this::disconnectAndExit, "ledgerlog-gateway-exit");
        t.setDaemon(true);
        t.start();
    }

    /** Best-effort disconnect (bounded to 5 s), then System.exit(0). */
    private void disconnectAndExit() {
        Thread closer = new Thread(() -> {
            try {
                disconnect();
            } catch (Exception ignored) {
                // exiting anyway
            }
        }, "ledgerlog-gateway-disconnect");
        closer.setDaemon(true);
        closer.start();
        try {
            closer.join(5_000);
        } catch (InterruptedException ignored) {
            Thread.currentThread().interrupt();
        }
        System.exit(0);
    }

    // ------------------------------------------------------------------ diagnostics

    /** Returns "ok"; the cost of one round trip. */
    public String ping() {
        return "ok";
    }

    /** Returns the length of {@code data}; measures the cost of a request of a given size. */
    public int sinkBytes(byte[] data) {
        return data.length;
    }

    /** Returns {@code n} bytes; measures the cost of a response of a given size. */
    public byte[] echoBytes(int n) {
        byte[] out = new byte[n];
        Arrays.fill(out, (byte) 'x');
        return out;
    }

    // ------------------------------------------------------------------ ledgers

    /**
     * Creates a ledger (CRC32C digest) and returns a gateway handle id for writing it; the
     * ledger id is {@link #ledgerId(long)}.
     */
    public long createLedger(int ensemble, int writeQuorum, int ackQuorum, byte[] password)
            throws Exception {
        try {
            return register(client().createLedger(ensemble, writeQuorum, ackQuorum, DIGEST,
                    password));
        } catch (BKException e) {
            throw BkCallException.of("createLedger", e);
        }
    }

    /** The ledger id behind a handle. */
    public long ledgerId(long handleId) {
        return handle(handleId).getId();
    }

    /** Opens a ledger with recovery: fences the previous writer and closes the ledger. */
    public long openLedgerRecover(long ledgerId, byte[] password) throws Exception {
        try {
            return register(client().openLedger(ledgerId, DIGEST, password));
        } catch (BKException e) {
            throw BkCallException.of("openLedgerRecover(ledger " + ledgerId + ")", e);
        }
    }

    /** Opens a ledger for reading without fencing; reads see entries up to the LAC. */
    public long openLedgerNoRecovery(long ledgerId, byte[] password) throws Exception {
        try {
            long id = register(client().openLedgerNoRecovery(ledgerId, DIGEST, password));
            readers.add(id);
            return id;
        } catch (BKException e) {
            throw BkCallException.of("openLedgerNoRecovery(ledger " + ledgerId + ")", e);
        }
    }

    /**
     * Appends every entry of {@code packed} ({@code [4-byte length][bytes]...}) and waits for
     * all of them. Returns the id of the last entry; -1 stays the last pushed id when
     * {@code packed} is empty. Any failure throws {@link BkCallException}, whose message has
     * the BK error code (e.g. BKLedgerFencedException) and how many entries were acknowledged.
     */
    public long addEntries(long handleId, byte[] packed) throws Exception {
        LedgerHandle lh = handle(handleId);
        int count = countFrames(packed);
        if (count == 0) {
            return lh.getLastAddPushed();
        }
        BatchAdd batch = new BatchAdd(count);
        ByteBuffer buf = ByteBuffer.wrap(packed);
        while (buf.hasRemaining()) {
            int len = buf.getInt();
            lh.asyncAddEntry(packed, buf.position(), len, batch, null);
            buf.position(buf.position() + len);
        }
        String op = "addEntries(ledger " + lh.getId() + ")";
        if (!batch.done.await(addWaitMillis, TimeUnit.MILLISECONDS)) {
            throw new TimeoutException(op + ": " + (count - batch.done.getCount()) + " of "
                    + count + " adds completed within " + addWaitMillis
                    + " ms; the others may or may not be written");
        }
        int rc = batch.firstError.get();
        if (rc != BKException.Code.OK) {
            throw new BkCallException(op, rc, batch.maxEntryId.get(), batch.acked.get(),
                    batch.acked.get() + " of " + count
                    + " entries in this call acknowledged (last acknowledged entry id "
                    + batch.maxEntryId.get() + "); the others may or may not be written",
                    null);
        }
        return batch.maxEntryId.get();
    }

    /**
     * Reads entries from {@code firstEntryId} on, at most {@code maxCount} of them and about
     * {@code maxBytes} of payload (always at least one entry if any is readable), never past
     * the last-add-confirmed. For an open ledger read without recovery, the LAC is asked of
     * the bookies when {@code firstEntryId} is past the one known. Returns
     * {@code [8-byte entry id][4-byte length][bytes]...}, empty when nothing is readable.
     */
    public byte[] readEntries(long handleId, long firstEntryId, int maxCount, int maxBytes)
            throws Exception {
        LedgerHandle lh = handle(handleId);
        String op = "readEntries(ledger " + lh.getId() + ", from " + firstEntryId + ")";
        try {
            long lac = lh.getLastAddConfirmed();
            if (firstEntryId > lac && isUnsealedReader(handleId, lh)) {
                lac = Math.max(lac, lh.readLastConfirmed());
            }
            long last = Math.min(lac, firstEntryId + Math.max(maxCount, 1) - 1);
            ByteArrayOutputStream bytes = new ByteArrayOutputStream();
            DataOutputStream out = new DataOutputStream(bytes);
            long next = firstEntryId;
            int payload = 0;
            int returned = 0;
            while (next <= last) {
                int chunk = READ_CHUNK_MAX;
                if (returned > 0) {
                    long avg = Math.max(1, payload / returned);
                    chunk = (int) Math.min(READ_CHUNK_MAX, Math.max(1, (maxBytes - payload) / avg));
                }
                long chunkEnd = Math.min(last, next + chunk - 1);
                Enumeration<LedgerEntry> entries = lh.readEntries(next, chunkEnd);
                while (entries.hasMoreElements()) {
                    LedgerEntry entry = entries.nextElement();
                    byte[] data = entry.getEntry();
                    if (returned > 0 && payload + data.length > maxBytes) {
                        return bytes.toByteArray();
                    }
                    out.writeLong(entry.getEntryId());
                    out.writeInt(data.length);
                    out.write(data);
                    payload += data.length;
                    returned++;
                    next = entry.getEntryId() + 1;
                }
            }
            out.flush();
            return bytes.toByteArray();
        } catch (BKException e) {
            throw BkCallException.of(op, e);
        }
    }

    /**
     * {@link #readEntries} over many handles in one call (an intake polls every client's
     * ledger at once). {@code requests} is {@code [8-byte handle id][8-byte first entry id]...};
     * each handle gets at most {@code maxCountEach} entries and the call about
     * {@code maxBytes} of payload in all. Returns
     * {@code [8-byte handle id][8-byte entry id][4-byte length][bytes]...}. A handle that
     * fails is skipped (logged by the client library); the others are still read.
     */
    public byte[] readEntriesMulti(byte[] requests, int maxCountEach, int maxBytes)
            throws Exception {
        ByteBuffer req = ByteBuffer.wrap(requests);
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        DataOutputStream out = new DataOutputStream(bytes);
        int budget = maxBytes;
        while (req.remaining() >= 16 && budget > 0) {
            long handleId = req.getLong();
            long first = req.getLong();
            byte[] got;
            try {
                got = readEntries(handleId, first, maxCountEach, budget);
            } catch (BkCallException | IllegalArgumentException e) {
                continue;
            }
            ByteBuffer g = ByteBuffer.wrap(got);
            while (g.remaining() >= 12) {
                long entryId = g.getLong();
                int len = g.getInt();
                out.writeLong(handleId);
                out.writeLong(entryId);
                out.writeInt(len);
                out.write(got, g.position(), len);
                g.position(g.position() + len);
                budget -= len;
            }
        }
        out.flush();
        return bytes.toByteArray();
    }

    /**
     * The last-add-confirmed of a handle. For an open ledger read without recovery it is
     * asked of the bookies (it trails the writer's by about one entry unless the writer sends
     * explicit LACs, client setting explicitLacInterval).
     */
    public long lastAddConfirmed(long handleId) throws Exception {
        LedgerHandle lh = handle(handleId);
        try {
            if (isUnsealedReader(handleId, lh)) {
                return Math.max(lh.getLastAddConfirmed(), lh.readLastConfirmed());
            }
            return lh.getLastAddConfirmed();
        } catch (BKException e) {
            throw BkCallException.of("lastAddConfirmed(ledger " + lh.getId() + ")", e);
        }
    }

    /** Whether the ledger's metadata, as known to this handle, says it is closed. */
    public boolean isLedgerClosed(long handleId) {
        return handle(handleId).isClosed();
    }

    /** Closes a handle (a writer's close seals the ledger) and forgets it. */
    public void closeLedger(long handleId) throws Exception {
        LedgerHandle lh = handles.remove(handleId);
        readers.remove(handleId);
        if (lh == null) {
            throw new IllegalArgumentException("unknown ledger handle " + handleId);
        }
        try {
            lh.close();
        } catch (BKException e) {
            throw BkCallException.of("closeLedger(ledger " + lh.getId() + ")", e);
        }
    }

    /** Deletes a ledger by ledger id. */
    public void deleteLedger(long ledgerId) throws Exception {
        try {
            client().deleteLedger(ledgerId);
        } catch (BKException e) {
            throw BkCallException.of("deleteLedger(ledger " + ledgerId + ")", e);
        }
    }

    // ------------------------------------------------------------------ ZooKeeper

    /** Creates a node; returns its actual path (differs when sequential). */
    public String zkCreate(String path, byte[] data, boolean ephemeral, boolean sequential)
            throws Exception {
        CreateMode mode = ephemeral
                ? (sequential ? CreateMode.EPHEMERAL_SEQUENTIAL : CreateMode.EPHEMERAL)
                : (sequential ? CreateMode.PERSISTENT_SEQUENTIAL : CreateMode.PERSISTENT);
        return session().create(path, data, ZooDefs.Ids.OPEN_ACL_UNSAFE, mode);
    }

    /** Creates a persistent node and its missing parents (empty data); no error if present. */
    public void zkEnsurePath(String path) throws Exception {
        StringBuilder prefix = new StringBuilder();
        for (String part : path.split("/")) {
            if (part.isEmpty()) {
                continue;
            }
            prefix.append('/').append(part);
            try {
                session().create(prefix.toString(), new byte[0], ZooDefs.Ids.OPEN_ACL_UNSAFE,
                        CreateMode.PERSISTENT);
            } catch (KeeperException.NodeExistsException ignored) {
                // already there
            }
        }
    }

    /** A node's data, or null if the node does not exist. */
    public byte[] zkGet(String path) throws Exception {
        try {
            byte[] data = session().getData(path, false, null);
            return data == null ? new byte[0] : data;
        } catch (KeeperException.NoNodeException e) {
            return null;
        }
    }

    /** A node's data version, or -1 if the node does not exist. */
    public int zkGetVersion(String path) throws Exception {
        Stat stat = session().exists(path, false);
        return stat == null ? -1 : stat.getVersion();
    }

    /**
     * Sets a node's data if its version is {@code version} (-1: any version). Returns the new
     * version, or -1 on a version conflict. A missing node throws NoNodeException.
     */
    public int zkSetIfVersion(String path, byte[] data, int version) throws Exception {
        try {
            return session().setData(path, data, version).getVersion();
        } catch (KeeperException.BadVersionException e) {
            return -1;
        }
    }

    /**
     * A node's children, sorted, joined with "/" (which no child name can contain): one
     * string crosses py4j in one piece, where a String[] would cost a call per element.
     * Empty string: no children; null: no such node.
     */
    public String zkChildren(String path) throws Exception {
        try {
            List<String> children = session().getChildren(path, false);
            return String.join("/", children.stream().sorted().toList());
        } catch (KeeperException.NoNodeException e) {
            return null;
        }
    }

    /**
     * Deletes a node if its version is {@code version} (-1: any). Returns false if the node
     * does not exist or has another version.
     */
    public boolean zkDelete(String path, int version) throws Exception {
        try {
            session().delete(path, version);
            return true;
        } catch (KeeperException.NoNodeException | KeeperException.BadVersionException e) {
            return false;
        }
    }

    /**
     * A node's data version and data in one piece: {@code [4-byte version][data]}, or null if
     * the node does not exist (a compare-and-set needs both from the same read).
     */
    public byte[] zkGetStat(String path) throws Exception {
        Stat stat = new Stat();
        byte[] data;
        try {
            data = session().getData(path, false, stat);
        } catch (KeeperException.NoNodeException e) {
            return null;
        }
        if (data == null) {
            data = new byte[0];
        }
        ByteBuffer out = ByteBuffer.allocate(4 + data.length);
        out.putInt(stat.getVersion());
        out.put(data);
        return out.array();
    }

    /**
     * Creates a node unless it exists (parents must exist). Returns true if this call created
     * it. Ephemeral nodes belong to this gateway's ZooKeeper session.
     */
    public boolean zkTryCreate(String path, byte[] data, boolean ephemeral) throws Exception {
        try {
            session().create(path, data, ZooDefs.Ids.OPEN_ACL_UNSAFE,
                    ephemeral ? CreateMode.EPHEMERAL : CreateMode.PERSISTENT);
            return true;
        } catch (KeeperException.NodeExistsException e) {
            return false;
        }
    }

    /**
     * Reads every entry of a ledger from {@code firstEntryId} up to its last-add-confirmed in
     * one call (for a writer's takeover scan of a recovered, closed ledger); same format as
     * {@link #readEntries}. Bounded by {@code maxBytes} of payload like readEntries.
     */
    public byte[] readAll(long handleId, long firstEntryId, int maxBytes) throws Exception {
        return readEntries(handleId, firstEntryId, Integer.MAX_VALUE - 1, maxBytes);
    }

    /**
     * The bookies of every ensemble a handle's ledger has had, "/"-joined (for tests that
     * need to kill a bookie the ledger writes to).
     */
    public String ledgerBookies(long handleId) {
        Set<String> ids = new java.util.TreeSet<>();
        for (List<org.apache.bookkeeper.net.BookieId> ensemble
                : handle(handleId).getLedgerMetadata().getAllEnsembles().values()) {
            for (org.apache.bookkeeper.net.BookieId b : ensemble) {
                ids.add(b.toString());
            }
        }
        return String.join("/", ids);
    }

    /** The ZooKeeper session id (ephemeral nodes belong to it), in hex. */
    public String zkSessionId() throws Exception {
        return Long.toHexString(session().getSessionId());
    }

    // ------------------------------------------------------------------ internals

    private BookKeeper client() {
        BookKeeper c = bk;
        if (c == null) {
            throw new IllegalStateException("not connected: call connect(zkConnect) first");
        }
        return c;
    }

    private ZooKeeper session() throws Exception {
        ZooKeeper z = zk;
        if (z == null && zkConnectString == null) {
            throw new IllegalStateException("not connected: call connect(zkConnect) first");
        }
        if (z == null || zkExpired || !z.getState().isAlive()) {
            return renewSession();
        }
        return z;
    }

    private long register(LedgerHandle lh) {
        long id = nextHandleId.getAndIncrement();
        handles.put(id, lh);
        return id;
    }

    private LedgerHandle handle(long handleId) {
        LedgerHandle lh = handles.get(handleId);
        if (lh == null) {
            throw new IllegalArgumentException("unknown ledger handle " + handleId);
        }
        return lh;
    }

    private boolean isUnsealedReader(long handleId, LedgerHandle lh) {
        return readers.contains(handleId) && !lh.isClosed();
    }

    private static int countFrames(byte[] packed) {
        ByteBuffer buf = ByteBuffer.wrap(packed);
        int count = 0;
        while (buf.hasRemaining()) {
            if (buf.remaining() < 4) {
                throw new IllegalArgumentException("truncated length prefix at byte "
                        + buf.position());
            }
            int len = buf.getInt();
            if (len < 0 || len > buf.remaining()) {
                throw new IllegalArgumentException("bad entry length " + len + " at byte "
                        + (buf.position() - 4));
            }
            buf.position(buf.position() + len);
            count++;
        }
        return count;
    }

    /** Completion of one addEntries batch: counts down once per entry. */
    private static final class BatchAdd implements AddCallback {
        final CountDownLatch done;
        final AtomicInteger firstError = new AtomicInteger(BKException.Code.OK);
        final AtomicInteger acked = new AtomicInteger();
        final AtomicLong maxEntryId = new AtomicLong(-1);

        BatchAdd(int count) {
            done = new CountDownLatch(count);
        }

        @Override
        public void addComplete(int rc, LedgerHandle lh, long entryId, Object ctx) {
            if (rc == BKException.Code.OK) {
                acked.incrementAndGet();
                maxEntryId.accumulateAndGet(entryId, Math::max);
            } else {
                firstError.compareAndSet(BKException.Code.OK, rc);
            }
            done.countDown();
        }
    }

    // ------------------------------------------------------------------ main

    public static void main(String[] args) throws Exception {
        int port = args.length > 0 ? Integer.parseInt(args[0]) : 0;
        boolean exitOnStdinEof = Arrays.asList(args).contains("--exit-on-stdin-eof");
        boolean noDelay = Boolean.parseBoolean(
                System.getProperty("ledgerlog.gateway.tcpNoDelay", "true"));
        String token = System.getenv("LEDGERLOG_GATEWAY_TOKEN");

        Gateway entryPoint = new Gateway();
        GatewayServer.GatewayServerBuilder builder = new GatewayServer.GatewayServerBuilder()
                .entryPoint(entryPoint)
                .javaAddress(InetAddress.getLoopbackAddress())
                .javaPort(port)
                .serverSocketFactory(new NoDelayServerSocketFactory(noDelay));
        if (token != null && !token.isEmpty()) {
            builder.authToken(token);
        }
        GatewayServer server = builder.build();
        server.start(true);
        System.out.println("LEDGERLOG_GATEWAY_PORT=" + server.getListeningPort());
        System.out.flush();

        if (exitOnStdinEof) {
            // The launching Python process holds our stdin; EOF means it is gone.
            byte[] sink = new byte[256];
            while (System.in.read(sink) >= 0) {
                // discard
            }
            entryPoint.disconnectAndExit();
        }
    }
}
