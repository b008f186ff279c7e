"""A WebSocket chat room: whatever one client says, every client hears.

    python pagi_ref.py examples/ws_chat.py:app

then, in a browser's JavaScript console (one tab per person):

    ws = new WebSocket("ws://127.0.0.1:8000/?name=alice")
    ws.onmessage = (e) => console.log(e.data)
    ws.send("hello")            // everyone, alice included, sees "alice: hello"
    ws.send("/quit")            // the server closes with 1000 "bye"

or with any command-line client (``websocat ws://127.0.0.1:8000/?name=bob``).

Each connection is one call of the application, which lasts the whole
session.  It runs two tasks side by side: one listens to its client and
broadcasts what it says, the other sends the client what the room says,
from a queue of its own (its "outbox"), at the pace the client reads.
``pagi_ref.wait_any`` ends the session when either task ends.  A client
that does not read fast enough does not hold up the others: while its
outgoing buffer is at the high-water mark (``pagi.transport``) or its
outbox is full, messages for it are skipped and counted, and it is told
how many it missed.  See docs/tutorial.md, "WebSocket".
"""
import collections
from urllib.parse import parse_qs

import pagi_ref

OUTBOX_LIMIT = 100      # messages queued for one member before they are skipped


class Member:
    """One connection in the room, and what waits to be sent to it."""

    def __init__(self, name, transport):
        self.name = name
        self.transport = transport        # scope["pagi.transport"], or None
        self.outbox = collections.deque()
        self.missed = 0                   # messages skipped while it was behind
        self.wakeup = None                # the Future its sender task sleeps on

    def behind(self):
        """True while the client is not keeping up: the bytes the server holds
        for it have reached the high-water mark, or its outbox is full."""
        if len(self.outbox) >= OUTBOX_LIMIT:
            return True
        transport = self.transport
        if transport is None or transport.high_water_mark() is None:
            return False
        return transport.buffered_amount() >= transport.high_water_mark()

    def post(self, text):
        if self.behind():
            self.missed += 1      # skip it rather than queue without end
        else:
            self.outbox.append(text)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)


def deliver(member, send):
    """The sender task of one member: its outbox, in order, at its pace."""
    while True:
        while not member.outbox and not member.missed:
            member.wakeup = pagi_ref.Future()
            yield member.wakeup           # until post() has something for it
        if member.missed:
            text = "* you missed %d messages (not reading fast enough)" % member.missed
            member.missed = 0
        else:
            text = member.outbox.popleft()
        # Suspends while the client leaves too much unread (the high-water mark).
        yield send({"type": "websocket.send", "text": text})


class ChatRoom:
    """The application; each instance is one room."""

    def __init__(self):
        self.members = {}       # name -> Member
        self.guests = 0

    def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            # lifespan included: raising declines it (lifespan "auto" goes on).
            raise ValueError("this application serves websocket only, not %r" % scope["type"])
        return self.session(scope, receive, send)

    def broadcast(self, text):
        for member in list(self.members.values()):
            member.post(text)

    def session(self, scope, receive, send):
        event = yield receive()
        if event["type"] != "websocket.connect":
            return
        query = parse_qs(scope["query_string"].decode("latin-1"))
        name = query.get("name", [""])[0][:32]
        if not name:
            self.guests += 1
            name = "guest-%d" % self.guests
        if name in self.members:
            # websocket.close before websocket.accept: the client gets a 403.
            yield send({"type": "websocket.close"})
            return
        yield send({"type": "websocket.accept"})
        # A ping every 20 s; a client that has not answered in 10 s is gone.
        yield send({"type": "websocket.keepalive", "interval": 20.0, "timeout": 10.0})
        member = self.members[name] = Member(name, scope.get("pagi.transport"))
        self.broadcast("* %s joined" % name)
        sending = pagi_ref.spawn(deliver(member, send))
        listening = pagi_ref.spawn(self.listen(member, receive, send))
        try:
            # Whichever ends first: the client left, or a task failed.
            first = yield pagi_ref.wait_any(listening, sending)
            first.result()        # re-raises the exception of a failed task
        finally:
            del self.members[name]
            sending.cancel()      # wait_any cancels nothing: stop the other one
            listening.cancel()
            self.broadcast("* %s left" % name)

    def listen(self, member, receive, send):
        """The listener task: what the client says goes to the whole room.
        Returns the websocket.disconnect event."""
        while True:
            event = yield receive()
            if event["type"] == "websocket.disconnect":
                return event      # event["code"], event["reason"]: how it ended
            text = event["text"]
            if text is None:
                continue          # a binary message: this room is text only
            if text == "/quit":
                # The close handshake: the disconnect event follows once the
                # client has answered (or after 5 s without an answer).
                yield send({"type": "websocket.close", "code": 1000, "reason": "bye"})
                continue
            self.broadcast("%s: %s" % (member.name, text))


app = ChatRoom()
