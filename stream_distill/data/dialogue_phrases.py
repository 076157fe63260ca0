"""Agent turns and follow-up phrasing for :mod:`stream_distill.data.synthetic`."""

from __future__ import annotations

# (agent text, intent the user would be asking for by simply accepting, or None).
AGENT_REPLIES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "order_status": (
        ("Order {order} is packed and ships {eta}.", None),
        ("It's on its way. Would you like the tracking link?", "track_package"),
        ("It's still being processed. Would you like me to cancel it instead?", "cancel_order"),
    ),
    "track_package": (
        ("Tracking {tracking} shows it in {city}, arriving {eta}.", None),
        ("The carrier reports a delay. Shall I open a delivery investigation?", "delivery_delay"),
        ("Here is your tracking link: track.example.com/{tracking}", None),
    ),
    "refund_request": (
        ("Your refund of {amount} was issued and takes 3-5 business days.", None),
        ("I can see the return arrived, I'll process the refund now.", None),
        ("The return hasn't reached us yet. Shall I send a new return label?", "return_item"),
    ),
    "return_item": (
        ("You have 30 days to return it. Want me to email you a return label?", "return_item"),
        ("Returns are free. Would you like a refund once it's back with us?", "refund_request"),
        ("You can drop returns at any post office in {city}.", None),
    ),
    "change_shipping_address": (
        ("I've updated the address for {order} to {city}.", None),
        (
            "It already shipped. I can ask the carrier to redirect it, ok?",
            "change_shipping_address",
        ),
        ("Too late to change it, sorry. Would you like to cancel and reorder?", "cancel_order"),
    ),
    "payment_failed": (
        ("Your bank declined it. Want to update your payment method?", "update_payment_method"),
        ("We had a brief outage; please try again now.", None),
        ("I don't see a charge for {amount} on our side.", None),
    ),
    "apply_coupon": (
        ("I've applied {coupon}; you saved {amount}.", None),
        ("That code expired on {date}. I can apply a 10% code instead, want that?", "apply_coupon"),
        ("Enter it in the promo code box at checkout.", None),
    ),
    "product_question": (
        ("Yes, the {product} comes with a 2-year warranty and a charger.", None),
        ("It's currently in stock in three colours.", None),
        ("Let me check with a specialist. Shall I connect you?", "speak_to_human"),
    ),
    "complaint": (
        ("I'm very sorry. Would you like me to pass this to a supervisor?", "speak_to_human"),
        ("I apologise. I've logged your complaint under reference {tracking}.", None),
        ("I'm sorry. Would a refund of {amount} help make this right?", "refund_request"),
    ),
    "cancel_order": (
        ("Order {order} has been cancelled.", None),
        ("It has already shipped, but you can return it. Want a return label?", "return_item"),
        ("Cancelled. Your refund of {amount} is on its way.", None),
    ),
    "update_payment_method": (
        ("You can change it under Account > Payments.", None),
        ("I've removed the card ending {last4}.", None),
        ("I can send a secure link to update your card, want that?", "update_payment_method"),
    ),
    "delivery_delay": (
        ("Sorry for the delay, it is now expected {eta}.", None),
        ("The carrier had issues in {city}. Would you like a refund instead?", "refund_request"),
        ("I apologise. Shall I cancel the order for you instead?", "cancel_order"),
    ),
    "damaged_item": (
        ("I'm sorry it arrived damaged. Shall I send a replacement?", "damaged_item"),
        ("Sorry about that! Would you prefer a refund?", "refund_request"),
        ("Could you send a photo of the damage to support@example.com?", None),
    ),
    "wrong_item": (
        ("Sorry for the mix-up. Shall I ship the correct item today?", "wrong_item"),
        ("Apologies. Would you like a prepaid label to send it back?", "return_item"),
        ("I'll look into what happened with {order}.", None),
    ),
    "account_login": (
        ("Your account is locked after failed attempts. Send a reset link?", "reset_password"),
        ("Try clearing your browser cookies and signing in again.", None),
        ("I've unlocked the account for {email}.", None),
    ),
    "reset_password": (
        ("I've sent a reset link to {email}.", None),
        ("Reset links expire after an hour. Shall I send a new one?", "reset_password"),
        ("Use 'Forgot password' on the sign-in page.", None),
    ),
    "subscription_cancel": (
        ("Your membership is cancelled as of {date}.", None),
        ("You could pause it instead. Do you still want me to cancel it?", "subscription_cancel"),
        ("Done, you won't be charged {amount} again.", None),
    ),
    "gift_card": (
        ("Your gift card balance is {amount}.", None),
        ("You can redeem it at checkout under 'gift card'.", None),
        ("That code looks invalid. Shall I connect you to our gift card team?", "speak_to_human"),
    ),
    "price_match": (
        ("We match within 14 days. Shall I refund the {amount} difference?", "price_match"),
        ("Sorry, we only match our own price drops.", None),
        ("Please send me a link to the lower price.", None),
    ),
    "warranty_claim": (
        ("The warranty on the {product} is 2 years. Want me to start a claim?", "warranty_claim"),
        ("I've opened claim {tracking}; we'll email you a shipping label.", None),
        ("That's outside the warranty, but I can offer a repair quote.", None),
    ),
    "store_hours": (
        ("The {city} store is open 9am to 9pm, Monday to Saturday.", None),
        ("We're open 10am to 6pm on Sundays.", None),
        ("Holiday hours are listed on our website.", None),
    ),
    "speak_to_human": (
        ("Connecting you to an agent now, the wait is about {days} minutes.", None),
        ("All agents are busy right now. Shall I arrange a callback?", "speak_to_human"),
        ("I can help too! What do you need?", None),
    ),
    "black_friday_deal": (
        ("Black Friday deals start on {date}.", None),
        ("The {product} will be 30% off on Black Friday.", None),
        ("I can apply the Black Friday price to {order}, want me to?", "black_friday_deal"),
    ),
    "loyalty_points": (
        ("You have {points} points.", None),
        ("Points appear 14 days after delivery. Want me to add them manually?", "loyalty_points"),
        ("You can redeem points at checkout.", None),
    ),
}

GREETINGS: tuple[str, ...] = (
    "Hi! How can I help you today?",
    "Hello, welcome to ShopCo support. What can I do for you?",
    "Hi there, what can I help you with?",
)

# Agent turn after the user accepted an offer: the request is settled, nothing new is offered.
ACKS: tuple[str, ...] = (
    "Done! Anything else?",
    "All set, you'll get an email confirmation shortly.",
    "Sure, that's done now.",
    "Okay, I've taken care of it.",
)

ACCEPTS: tuple[str, ...] = (
    "yes please do that",
    "yes please",
    "sure, go ahead",
    "ok do it",
    "yeah that would be great",
    "please do",
    "yes",
    "sounds good",
    "yep, go for it",
    "that works, thanks",
    "ok sure",
    "yes that's fine",
)

# Follow-ups that repeat the previous intent for another object.
INHERIT_GENERIC: tuple[str, ...] = (
    "what about the other one?",
    "and the other one?",
    "same question for my second one",
    "what about the second one",
    "and that one?",
    "same for the other one please",
    "how about the other one",
    "ok and what about the other?",
)
INHERIT_ORDER: tuple[str, ...] = (
    "and {order}?",
    "same for {order} please",
    "what about {order}?",
    "can you check {order} too",
    "also {order}",
)
INHERIT_PRODUCT: tuple[str, ...] = (
    "and the {product}?",
    "what about the {product}?",
    "same for the {product}?",
)
INHERIT_CITY: tuple[str, ...] = (
    "and in {city}?",
    "what about the {city} one?",
    "same for {city}?",
)
ORDER_SCOPED = frozenset(
    {
        "order_status",
        "track_package",
        "cancel_order",
        "refund_request",
        "delivery_delay",
        "change_shipping_address",
        "wrong_item",
        "return_item",
        "apply_coupon",
        "gift_card",
        "loyalty_points",
    }
)
PRODUCT_SCOPED = frozenset(
    {
        "product_question",
        "warranty_claim",
        "price_match",
        "return_item",
        "damaged_item",
        "black_friday_deal",
    }
)
CITY_SCOPED = frozenset({"store_hours"})

_CANCEL_IT = (
    "actually just cancel it",
    "forget it, cancel it",
    "ok then just cancel it",
    "can you cancel it then",
    "never mind, please cancel it",
    "just cancel the whole thing",
)
_STILL_BROKEN = (
    "it still doesn't work",
    "still not working",
    "tried that, same problem",
    "nope, same thing",
)

# Short turns whose intent is a function of the previous user intent: (phrases, {previous: intent}).
PIVOTS: tuple[tuple[tuple[str, ...], dict[str, str]], ...] = (
    (
        _CANCEL_IT,
        {
            p: "cancel_order"
            for p in (
                "order_status",
                "track_package",
                "delivery_delay",
                "change_shipping_address",
                "payment_failed",
                "apply_coupon",
                "price_match",
                "black_friday_deal",
            )
        },
    ),
    (_CANCEL_IT, {"subscription_cancel": "subscription_cancel"}),
    (
        (
            "then i just want my money back",
            "ok just refund it",
            "fine, refund me then",
            "can i get my money back instead",
        ),
        {
            p: "refund_request"
            for p in (
                "damaged_item",
                "wrong_item",
                "delivery_delay",
                "complaint",
                "cancel_order",
                "return_item",
                "warranty_claim",
            )
        },
    ),
    (
        ("can i just send it back?", "ok i'll send it back then", "how do i send it back"),
        {
            p: "return_item"
            for p in ("wrong_item", "product_question", "damaged_item", "price_match")
        },
    ),
    (
        ("can you change it to {city}?", "send it to {city} instead", "actually make that {city}"),
        {p: "change_shipping_address" for p in ("order_status", "track_package", "delivery_delay")},
    ),
    (
        _STILL_BROKEN,
        {
            p: p
            for p in (
                "account_login",
                "reset_password",
                "payment_failed",
                "apply_coupon",
                "gift_card",
            )
        },
    ),
    (
        ("this is ridiculous", "that's not acceptable", "are you serious? unbelievable"),
        {
            p: "complaint"
            for p in ("delivery_delay", "damaged_item", "wrong_item", "refund_request")
        },
    ),
    (
        ("so where is it now?", "where is it right now", "can i track it?"),
        {p: "track_package" for p in ("order_status", "delivery_delay", "change_shipping_address")},
    ),
    (
        ("can i use {coupon} on it?", "does {coupon} work for that", "apply {coupon} to it please"),
        {p: "apply_coupon" for p in ("product_question", "order_status", "black_friday_deal")},
    ),
    (
        ("can i use a different card?", "let me try another card", "ok i'll switch cards"),
        {"payment_failed": "update_payment_method"},
    ),
)

POLITE_PREFIXES: tuple[str, ...] = (
    "hi, ",
    "hello, ",
    "hey ",
    "good morning, ",
    "hi there. ",
    "excuse me, ",
    "um ",
    "so ",
    "quick question: ",
    "sorry to bother you, ",
)
POLITE_SUFFIXES: tuple[str, ...] = (
    " thanks",
    " thank you",
    " please",
    " thx",
    " asap",
    "!",
    "??",
    " :)",
    ", thanks in advance",
)
FOLLOWUP_PREFIXES: tuple[str, ...] = ("ok ", "hmm ", "ah ", "right, ", "oh ")
CONNECTORS: tuple[str, ...] = ("also, ", "one more thing, ", "another question: ", "and ", "btw ")
DECLINES: tuple[str, ...] = ("no thanks. ", "no, that's ok. ", "not now. ")
