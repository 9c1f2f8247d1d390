package io.ledgerlog.bk;

import java.io.IOException;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import javax.net.ServerSocketFactory;

/**
 * Server sockets whose accepted connections have TCP_NODELAY set (or explicitly cleared).
 *
 * <p>py4j writes a response in several small writes; with Nagle's algorithm on, the second
 * write of a response of about 8 KB or more waits for the ACK of the first, which the Python
 * side delays by up to 40 ms. Setting TCP_NODELAY on the accepted socket removes that stall.
 */
final class NoDelayServerSocketFactory extends ServerSocketFactory {
    private final boolean noDelay;

    NoDelayServerSocketFactory(boolean noDelay) {
        this.noDelay = noDelay;
    }

    @Override
    public ServerSocket createServerSocket() throws IOException {
        return new NoDelayServerSocket(noDelay);
    }

    @Override
    public ServerSocket createServerSocket(int port) throws IOException {
        ServerSocket s = createServerSocket();
        s.bind(new java.net.InetSocketAddress(port));
        return s;
    }

    @Override
    public ServerSocket createServerSocket(int port, int backlog) throws IOException {
        ServerSocket s = createServerSocket();
        s.bind(new java.net.InetSocketAddress(port), backlog);
        return s;
    }

    @Override
    public ServerSocket createServerSocket(int port, int backlog, InetAddress addr)
            throws IOException {
        ServerSocket s = createServerSocket();
        s.bind(new java.net.InetSocketAddress(addr, port), backlog);
        return s;
    }

    private static final class NoDelayServerSocket extends ServerSocket {
        private final boolean noDelay;

        NoDelayServerSocket(boolean noDelay) throws IOException {
            super();
            this.noDelay = noDelay;
        }

        @Override
        public Socket accept() throws IOException {
            Socket socket = super.accept();
            socket.setTcpNoDelay(noDelay);
            return socket;
        }
    }
}
