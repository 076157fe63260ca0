"""Phrase tables for :mod:`stream_distill.data.synthetic`.

Placeholders in braces are slots filled per turn: ``{order}``, ``{tracking}``, ``{product}``,
``{product2}``, ``{date}``, ``{eta}``, ``{city}``, ``{amount}``, ``{coupon}``, ``{email}``,
``{last4}``, ``{days}``, ``{points}``. Intents deliberately overlap in vocabulary (order status vs.
tracking vs. delay, damaged vs. warranty) so that the classification problem is not trivial.
"""

from __future__ import annotations

INTENTS: tuple[str, ...] = (
    "order_status",
    "refund_request",
    "return_item",
    "change_shipping_address",
    "payment_failed",
    "apply_coupon",
    "product_question",
    "complaint",
    "cancel_order",
    "track_package",
    "update_payment_method",
    "delivery_delay",
    "damaged_item",
    "wrong_item",
    "account_login",
    "reset_password",
    "subscription_cancel",
    "gift_card",
    "price_match",
    "warranty_claim",
    "store_hours",
    "speak_to_human",
)

# Held back from INTENTS so that a label space can be grown mid-stream.
PROMO_INTENTS: tuple[str, ...] = ("black_friday_deal", "loyalty_points")

USER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "order_status": (
        "where is my order {order}?",
        "what's the status of order {order}",
        "has my order {order} shipped yet",
        "can you check on my order please, it's {order}",
        "i placed an order on {date} and haven't heard anything since",
        "any update on {order}?",
        "is my {product} order confirmed?",
        "i want to know what's happening with my order",
        "did order {order} go through",
        "order number {order}, what's the status",
    ),
    "track_package": (
        "can i get the tracking number for {order}",
        "tracking {tracking} hasn't updated in {days} days",
        "the tracking link doesn't work for my package",
        "which carrier is delivering my {product}?",
        "where is the package right now? order {order}",
        "tracking says out for delivery since {date}, where is it",
        "how do i track my parcel",
        "can you send me the tracking link for {order}",
        "my package {tracking} is stuck in {city}",
        "track package {tracking}",
    ),
    "refund_request": (
        "i want a refund for order {order}",
        "how do i get my money back for the {product}",
        "please refund {amount} to my card",
        "i returned the {product} on {date} and still no refund",
        "when will i get my refund",
        "refund status for {order}?",
        "can i get a refund, i was charged {amount} twice",
        "i'd like my money back please",
        "still waiting on my refund of {amount}",
        "you owe me a refund for {order}",
    ),
    "return_item": (
        "how do i return the {product}",
        "i want to return an item from order {order}",
        "can i send back the {product}? it doesn't fit",
        "i need a return label for {order}",
        "what's your return policy",
        "is it too late to return something i bought on {date}",
        "the {product} isn't what i expected, i want to return it",
        "where do i drop off a return in {city}",
        "start a return for {order} please",
        "can i exchange the {product} for a different size",
    ),
    "change_shipping_address": (
        "i need to change the delivery address for {order}",
        "can you ship my order to {city} instead",
        "i moved, please update the shipping address on {order}",
        "wrong address on my order, it should go to {city}",
        "is it possible to change where my package goes",
        "update my shipping address to my new place in {city}",
        "i typed the wrong zip code on order {order}",
        "can i redirect my parcel to my office in {city}",
        "please send {order} to a different address",
        "change my delivery address before it ships",
    ),
    "payment_failed": (
        "my payment keeps failing",
        "why was my card declined for {amount}",
        "checkout says payment failed but i was charged",
        "i can't pay for my order, card ending {last4} gets declined",
        "payment error when buying the {product}",
        "the transaction didn't go through",
        "it says payment could not be processed",
        "tried paying {amount} three times and it fails every time",
        "my paypal payment failed for order {order}",
        "why does my payment not work",
    ),
    "apply_coupon": (
        "how do i use a promo code",
        "my coupon {coupon} isn't working",
        "can you apply code {coupon} to order {order}",
        "i forgot to enter my discount code",
        "the code {coupon} says expired but it shouldn't be",
        "where do i put the voucher code at checkout",
        "does {coupon} work on the {product}?",
        "i have a {amount} off coupon, how do i apply it",
        "can i still add a discount code after ordering",
        "discount code not applied to my total",
    ),
    "product_question": (
        "does the {product} come with a charger",
        "is the {product} waterproof?",
        "what size should i get for the {product}",
        "is the {product} in stock",
        "what colours does the {product} come in",
        "is the {product} compatible with iphone",
        "how long does the battery last on the {product}",
        "can you tell me more about the {product}",
        "what's the difference between the {product} and the pro version",
        "when will the {product} be back in stock",
    ),
    "complaint": (
        "this is the worst service i've ever had",
        "i'm really unhappy with how my order was handled",
        "i want to file a complaint",
        "your courier was rude to me in {city}",
        "i've been waiting {days} days and nobody answers my emails",
        "terrible experience, i'm never ordering from you again",
        "the quality of the {product} is awful",
        "i'm very disappointed with your customer service",
        "how do i escalate a complaint",
        "nobody in your {city} store would help me, unacceptable",
    ),
    "cancel_order": (
        "cancel my order {order}",
        "i want to cancel the order i placed on {date}",
        "please cancel order {order} before it ships",
        "how do i cancel an order",
        "i ordered the {product} by mistake, can you cancel it",
        "can i still cancel {order}?",
        "i changed my mind, cancel the {product} order",
        "stop my order please, {order}",
        "is it too late to cancel my order",
        "cancel everything on order {order}",
    ),
    "update_payment_method": (
        "how do i change my card on file",
        "i want to update my payment method",
        "please remove card ending {last4} from my account",
        "add a new credit card to my account",
        "my card expired, how do i put in the new one",
        "can i switch to paypal for future orders",
        "update billing info",
        "change the default payment card to the one ending {last4}",
        "where do i edit my payment details",
        "i got a new debit card, need to update it",
    ),
    "delivery_delay": (
        "my order is late",
        "it was supposed to arrive on {date} and it's still not here",
        "why is my delivery delayed",
        "the {product} is {days} days late",
        "expected delivery was {date}, what happened",
        "my package keeps getting pushed back",
        "order {order} is way overdue",
        "why is shipping taking so long",
        "delivery date changed again for {order}",
        "still haven't received my {product}, it's been {days} days",
    ),
    "damaged_item": (
        "my {product} arrived broken",
        "the box was crushed and the {product} is damaged",
        "item arrived with a cracked screen",
        "the {product} from order {order} is scratched",
        "received a damaged item",
        "the {product} doesn't turn on, looks like it got damaged in shipping",
        "half the glasses in my order arrived smashed",
        "package came torn open and the item is broken",
        "the {product} has a dent in it",
        "what do i do if my order came damaged",
    ),
    "wrong_item": (
        "i got the wrong item",
        "i ordered the {product} but received something else",
        "you sent me the wrong size",
        "this isn't what i ordered, order {order}",
        "wrong colour {product} delivered",
        "the package had someone else's order in it",
        "received a {product} instead of the {product2}",
        "my order {order} has the wrong product in it",
        "i got two of the same and none of what i ordered",
        "the item in the box doesn't match my order",
    ),
    "account_login": (
        "i can't log in to my account",
        "login isn't working",
        "it says my email {email} isn't registered",
        "my account is locked",
        "i keep getting an error when signing in",
        "can't access my account on the app",
        "the two factor code never arrives",
        "the site logs me out every time",
        "how do i sign in with {email}",
        "i can't get into my account since {date}",
    ),
    "reset_password": (
        "i forgot my password",
        "how do i reset my password",
        "the password reset email never arrived at {email}",
        "reset link says expired",
        "i need a new password",
        "can you send a password reset to {email}",
        "change my password please",
        "forgot password link not working",
        "how do i change my password on the app",
        "i want to reset my login password",
    ),
    "subscription_cancel": (
        "cancel my subscription",
        "how do i stop my monthly membership",
        "i want to end my premium plan",
        "stop charging me {amount} every month",
        "unsubscribe me from the subscription box",
        "i don't want the auto renewal anymore",
        "please cancel my membership before {date}",
        "how do i turn off recurring delivery",
        "end my subscription effective today",
        "i'd like to cancel my plus membership",
    ),
    "gift_card": (
        "how do i redeem a gift card",
        "my gift card balance is wrong",
        "can i buy a {amount} gift card",
        "gift card code isn't working",
        "check balance on my gift card",
        "can i use two gift cards on one order",
        "i lost my gift card, can you reissue it",
        "does the gift card expire",
        "send a digital gift card to {email}",
        "gift card wasn't applied to order {order}",
    ),
    "price_match": (
        "i saw the {product} cheaper somewhere else",
        "do you price match",
        "the {product} dropped to {amount} right after i bought it",
        "can you match the price at another store",
        "competitor has it for {amount}, will you match",
        "the price went down after i ordered, can i get the difference",
        "do you offer price adjustments",
        "another retailer sells the {product} for less",
        "price match request for order {order}",
        "it's {amount} cheaper on your own site now",
    ),
    "warranty_claim": (
        "my {product} stopped working after {days} days",
        "is the {product} under warranty",
        "i want to make a warranty claim",
        "how long is the warranty on the {product}",
        "the {product} broke, it's still under warranty",
        "can i get a warranty repair for my {product}",
        "warranty claim for order {order}",
        "the {product} has a manufacturing defect",
        "do i need the receipt for a warranty claim",
        "the {product} i bought on {date} is faulty",
    ),
    "store_hours": (
        "what time do you open",
        "are you open on sunday",
        "store hours in {city}?",
        "when does the {city} store close",
        "are you open on christmas eve",
        "what are your opening hours",
        "is the store in {city} open late tonight",
        "what time does customer service open",
        "holiday hours?",
        "is there a store near {city} and when is it open",
    ),
    "speak_to_human": (
        "i want to talk to a real person",
        "connect me to an agent",
        "can i speak to a human please",
        "let me talk to someone",
        "get me a manager",
        "are you a bot? i need a human",
        "representative",
        "live agent please",
        "i need to speak with customer service on the phone",
        "transfer me to a person",
    ),
    "black_friday_deal": (
        "when does the black friday sale start",
        "is the {product} part of the black friday deals",
        "will there be a cyber monday discount on the {product}",
        "black friday deal didn't apply to my cart",
        "how much off is the {product} on black friday",
        "can i get the black friday price on order {order}",
        "are black friday deals available in store in {city}",
        "is the black friday sale online only",
        "i missed black friday, is the deal still on",
        "early access to black friday deals?",
    ),
    "loyalty_points": (
        "how many loyalty points do i have",
        "my points from order {order} didn't show up",
        "how do i redeem my reward points",
        "i should have {points} points but it shows 0",
        "do loyalty points expire",
        "can i use points to pay for the {product}",
        "how do i join the rewards program",
        "points weren't added for my purchase on {date}",
        "what tier am i in the loyalty program",
        "transfer my rewards points to {email}",
    ),
}

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

PRODUCTS: tuple[str, ...] = (
    "pair of wireless earbuds",
    "coffee maker",
    "pair of running shoes",
    "yoga mat",
    "air fryer",
    "smart watch",
    "phone case",
    "winter jacket",
    "desk lamp",
    "bluetooth speaker",
    "backpack",
    "office chair",
    "blender",
    "hair dryer",
    "gaming mouse",
    "mechanical keyboard",
    "4k monitor",
    "electric toothbrush",
    "vacuum cleaner",
    "baby stroller",
    "pair of jeans",
    "pair of sunglasses",
    "tablet",
    "robot vacuum",
    "espresso machine",
    "kettle",
    "duvet cover",
    "tent",
    "suitcase",
    "fitness tracker",
)
CITIES: tuple[str, ...] = (
    "london",
    "manchester",
    "berlin",
    "paris",
    "madrid",
    "new york",
    "chicago",
    "austin",
    "seattle",
    "toronto",
    "sydney",
    "dublin",
    "amsterdam",
    "milan",
    "boston",
    "denver",
)
MONTHS: tuple[str, ...] = (
    "jan",
    "feb",
    "march",
    "april",
    "may",
    "june",
    "july",
    "aug",
    "sept",
    "oct",
    "nov",
    "dec",
)
RELATIVE_DATES: tuple[str, ...] = (
    "monday",
    "last tuesday",
    "yesterday",
    "the weekend",
    "last week",
    "friday",
    "the 5th",
    "two weeks ago",
)
ETAS: tuple[str, ...] = (
    "tomorrow",
    "on Friday",
    "within 2 days",
    "by Monday",
    "later today",
    "next week",
)
COUPON_WORDS: tuple[str, ...] = ("SAVE", "WELCOME", "SPRING", "VIP", "FREESHIP", "HELLO", "DEAL")
NAMES: tuple[str, ...] = ("anna", "tom", "maria", "j.smith", "lee", "sam", "priya", "omar", "kate")
DOMAINS: tuple[str, ...] = ("gmail.com", "yahoo.com", "outlook.com", "mail.com", "icloud.com")
CURRENCIES: tuple[str, ...] = ("$", "$", "€", "£")
ORDER_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
