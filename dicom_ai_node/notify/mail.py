"""An e-mail notification over SMTP (STARTTLS unless turned off, login when a user is set)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage

from dicom_ai_node.config import NotifyConfig


def send(target: NotifyConfig, subject: str, text: str) -> None:
    """Send one message; raises smtplib.SMTPException or OSError when it could not."""
    message = EmailMessage()
    message["Subject"], message["From"], message["To"] = subject, target.from_addr, ", ".join(target.to)
    message.set_content(text)
    with smtplib.SMTP(target.smtp_host, target.smtp_port, timeout=target.timeout_s) as smtp:
        if target.starttls:
            smtp.starttls(context=ssl.create_default_context())
        if target.user:
            smtp.login(target.user, target.password)
        smtp.send_message(message)
