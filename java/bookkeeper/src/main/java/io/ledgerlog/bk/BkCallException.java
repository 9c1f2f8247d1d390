package io.ledgerlog.bk;

import org.apache.bookkeeper.client.BKException;

/**
 * A BookKeeper call made through the gateway failed. The message names the operation, the
 * numeric BK error code and its exception name (e.g. {@code BKLedgerFencedException}), so the
 * Python side can match on the text of {@code Py4JJavaError} without further calls.
 */
public final class BkCallException extends Exception {
    private static final long serialVersionUID = 1L;

    private final int code;
    private final long lastAckedEntryId;
    private final int acknowledged;

    BkCallException(String operation, int code, long lastAckedEntryId, int acknowledged,
                    String detail, Throwable cause) {
        super(operation + " failed: BK error code " + code + " " + codeName(code) + " ("
                + BKException.getMessage(code) + ")" + (detail.isEmpty() ? "" : "; " + detail),
              cause);
        this.code = code;
        this.lastAckedEntryId = lastAckedEntryId;
        this.acknowledged = acknowledged;
    }

    static BkCallException of(String operation, BKException e) {
        return new BkCallException(operation, e.getCode(), -1, 0, "", e);
    }

    /** The name of the BKException subclass for a code, e.g. BKLedgerFencedException. */
    static String codeName(int code) {
        return BKException.create(code).getClass().getSimpleName();
    }

    /** The BK error code ({@link BKException.Code}). */
    public int getCode() {
        return code;
    }

    /** For addEntries: the highest entry id acknowledged in the failed call, or -1. */
    public long getLastAckedEntryId() {
        return lastAckedEntryId;
    }

    /** For addEntries: how many entries of the failed call were acknowledged. */
    public int getAcknowledged() {
        return acknowledged;
    }
}
